// nearest_tc.cu — tensor-core distance-argmin for vqx::nearest at low precision (SPEC §1, issue 6).
//
// What it computes
//   The same function as nearest_f32 (kernels/nearest.cu), with the dot products on tensor cores:
//   for each row x_n (N×D, row-major f32) against a codebook C (K×D, row-major f32) with
//   norms[k] = ||c_k||² in f32 (from the host, never rounded to the operand type),
//       s_k = norms[k] − 2·(x̃_n · c̃_k)
//   where x̃, c̃ are the operands rounded in this kernel, as they are staged to shared memory:
//     nearest_tf32: cvt.rna.tf32.f32 (round to nearest, ties away from zero; 10 mantissa bits),
//                   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32;
//     nearest_bf16: cvt.rn.bf16x2.f32 (round to nearest, ties to even; 7 mantissa bits),
//                   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32;
//   products and sums in f32 (the tensor cores' accumulator). Per row it writes the index of
//   the smallest score (ties → smallest k), that score and the runner-up score (+inf when
//   K = 1), exactly like nearest_f32. The host then runs vqx::nearest::finish with
//   RoundingModel::TF32 / BF16, whose bound covers the operand rounding, and recomputes exactly
//   every row whose margin is inside it: the indices are those of an exact computation.
//   vqx::nearest::emulate is this kernel's scoring on the CPU (the test oracle). Cosine is the
//   same kernel on normalised rows with norms of 1. The N×K matrix is never stored.
//
// Launch shape (kernels/tiles.cuh; the launcher is src/backend/cuda/launch.rs)
//   grid = (ceil(N / 128), 1, 1), block = (256, 1, 1), no dynamic shared memory.
//   Row-stationary: block b owns rows 128·b … 128·b + 127 and walks the whole codebook in tiles
//   of 128 codes; no atomics, no cross-block communication, deterministic. The dimension is
//   consumed in chunks of 16 32-bit words per row (tf32: 16 dims = 2 mma k-steps of 8; bf16:
//   32 dims = 2 k-steps of 16, two bf16 per word). Each chunk is read from global memory (f32,
//   16-byte loads when D % 4 == 0), rounded, and stored to shared memory, double-buffered
//   (2 × 2 × 128 × 20 words = 40 KiB, rows padded to 20 words so the fragment loads are free of
//   bank conflicts); the next chunk's global loads are issued before the current chunk's mma.
//   Warps: 2 (rows) × 4 (codes); warp w owns rows 64·(w / 4) … +63 and codes 32·(w % 4) … +31
//   of each tile = 4 × 4 mma tiles of 16×8, 64 f32 accumulators per thread. Fragments are read
//   from shared memory with 32-bit loads in the layouts of the PTX ISA (groupID = lane / 4,
//   threadID_in_group = lane % 4); no ldmatrix, no cp.async.
//   Epilogue of each code tile: s = fma(−2, acc, norms[k]) in f32, folded into per-row running
//   (best index, best, runner-up) — each thread sees its codes in increasing order, so a
//   strict `<` keeps the smallest index. At the end: shuffles across the 4 lanes that share a
//   row, then shared memory across the 4 code warps (6 KiB), merged in a fixed order preferring
//   the smaller index on equal scores.
//
// Limits
//   N < 2^63, K < 2^32 (u32 indices), D < 2^31, any D ≥ 1 (zero-padded to the chunk).
//   Inputs must be finite (the host validates); an operand near f32::MAX may round to ±inf and
//   is then caught by the host (a non-finite score is always rechecked). Requires sm_80+
//   (mma.sync with tf32/bf16). One block of 256 per SM by launch bounds (TC_MIN_BLOCKS): no
//   spills; see docs/ptxas-report.md for the compiler's report.

// Blocks per SM the register allocation is sized for: 1 gives ~172–177 registers and no spills
// (nvcc 13.0); 2 caps registers at 128 and spills 60–132 bytes. Which runs faster is for a
// GPU session to measure (scripts/gpu/run.sh); both are correct.
#ifndef TC_MIN_BLOCKS
#define TC_MIN_BLOCKS 1
#endif

#include "candidates.cuh"
#include "tiles.cuh"

// 8 warps as 2 (rows) × 4 (codes) of 64 × 32, two loader threads per row of a 128-row tile.
static_assert(TC_BM == 128 && TC_BN == 128 && TC_WORDS == 16 && TC_THREADS == 256 &&
                  TC_STRIDE >= TC_WORDS && TC_STRIDE % 4 == 0,
              "the tensor-core kernels' warp layout assumes 128 × 128 tiles, 16 words, 256 threads");

// Inline PTX cannot compile for the host: under VQX_EMU (the emulated device, emu/device.h) each
// helper calls its host twin instead, with the same operand order as the instruction.

__device__ __forceinline__ unsigned int to_tf32(float v) {
#ifdef VQX_EMU
    return vqx_emu::cvt_rna_tf32(v);
#else
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#endif
}

// Two bf16 in one word: `lo` (the smaller dimension index) in the low half, as the mma
// fragments expect. cvt.rn.bf16x2.f32 d, a, b puts a in the upper half and b in the lower.
__device__ __forceinline__ unsigned int to_bf16x2(float lo, float hi) {
#ifdef VQX_EMU
    return vqx_emu::cvt_rn_bf16x2(hi, lo);
#else
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// One warp-wide mma.sync into c (m16 × n8, f32): k = 8 tf32 or k = 16 bf16 per operand word
// set, the fragments as the PTX ISA lays them out. One asm template for both shapes.
#define VQX_MMA_SYNC(shape_types)                                                           \
    asm volatile("mma.sync.aligned." shape_types                                           \
                 " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"         \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <bool BF16>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                    unsigned int b1) {
#ifdef VQX_EMU
    if (BF16)
        vqx_emu::mma_m16n8k16_bf16(c, a, b0, b1);
    else
        vqx_emu::mma_m16n8k8_tf32(c, a, b0, b1);
#else
    if (BF16)
        VQX_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32");
    else
        VQX_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32");
#endif
}

// Reads the 8 words of dims this thread stages for one row of a tile, rounded to the operand
// type. BF16: word j holds dims base + 2j, base + 2j + 1; TF32: word j holds dim base + j.
template <bool BF16>
__device__ __forceinline__ void load_words(const float* __restrict__ row, bool row_ok, int base,
                                           int d, bool vec4, unsigned int (&w)[8]) {
    constexpr int F = BF16 ? 16 : 8;  // floats read
    float v[F];
    if (vec4) {
        // D % 4 == 0 and base % 4 == 0: each group of 4 is wholly inside or outside D.
#pragma unroll
        for (int q = 0; q < F / 4; ++q) {
            const int gd = base + 4 * q;
            float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
            if (row_ok && gd < d) t = *reinterpret_cast<const float4*>(row + gd);
            v[4 * q] = t.x;
            v[4 * q + 1] = t.y;
            v[4 * q + 2] = t.z;
            v[4 * q + 3] = t.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < F; ++j) {
            const int gd = base + j;
            v[j] = (row_ok && gd < d) ? row[gd] : 0.0f;
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = BF16 ? to_bf16x2(v[2 * j], v[2 * j + 1]) : to_tf32(v[j]);
}

template <bool BF16>
__device__ __forceinline__ void nearest_tc_body(const float* __restrict__ x,
                                                const float* __restrict__ cb,
                                                const float* __restrict__ norms,
                                                unsigned int* __restrict__ best_out,
                                                float* __restrict__ best_score_out,
                                                float* __restrict__ second_score_out,
                                                long long n, long long k, int d) {
    __shared__ __align__(16) unsigned int xs[2][TC_BM][TC_STRIDE];
    __shared__ __align__(16) unsigned int cs[2][TC_BN][TC_STRIDE];
    __shared__ unsigned int m_idx[4][TC_BM];
    __shared__ float m_best[4][TC_BM];
    __shared__ float m_second[4][TC_BM];

    constexpr int DIMS = BF16 ? 2 * TC_WORDS : TC_WORDS;  // dims per chunk
    constexpr int HALF = DIMS / 2;                          // dims per loader half-row

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;   // groupID
    const int t4 = lane & 3;   // threadID_in_group
    const int wm = warp >> 2;  // row half of the block: rows wm·64 …
    const int wn = warp & 3;   // code quarter of the tile: codes wn·32 …
    const long long row0 = (long long)blockIdx.x * TC_BM;
    const int rows_here = (int)min(n - row0, (long long)TC_BM);
    const unsigned int tiles = (unsigned int)((k + TC_BN - 1) / TC_BN);
    const int chunks = (d + DIMS - 1) / DIMS;
    const bool vec4 = (d & 3) == 0;

    // Loader: thread → (row lr = tid / 2, half lh = tid % 2 of the row's 16 words).
    const int lr = tid >> 1;
    const int lh = tid & 1;
    const float* __restrict__ xrow = x + (row0 + lr) * (long long)d;
    unsigned int xw[8], cw[8];
    auto load = [&](unsigned int tile, int chunk) {
        const long long code0 = (long long)tile * TC_BN;
        const int codes_here = (int)min(k - code0, (long long)TC_BN);
        const int base = chunk * DIMS + lh * HALF;
        load_words<BF16>(xrow, lr < rows_here, base, d, vec4, xw);
        load_words<BF16>(cb + (code0 + lr) * (long long)d, lr < codes_here, base, d, vec4, cw);
    };
    auto store = [&](int buf) {
        uint4* xd = reinterpret_cast<uint4*>(&xs[buf][lr][lh * 8]);
        uint4* cd = reinterpret_cast<uint4*>(&cs[buf][lr][lh * 8]);
        xd[0] = make_uint4(xw[0], xw[1], xw[2], xw[3]);
        xd[1] = make_uint4(xw[4], xw[5], xw[6], xw[7]);
        cd[0] = make_uint4(cw[0], cw[1], cw[2], cw[3]);
        cd[1] = make_uint4(cw[4], cw[5], cw[6], cw[7]);
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Running candidates of this thread's 8 rows: slot mi·2 + h is row wm·64 + mi·16 + g + 8h.
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
        unsigned int next_tile = tile;
        int next_chunk = chunk + 1;
        if (next_chunk == chunks) {
            next_chunk = 0;
            ++next_tile;
        }
        if (next_tile < tiles) load(next_tile, next_chunk);

#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            const int w0 = ks * 8 + t4;
            unsigned int b[4][2];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const unsigned int* crow = cs[buf][wn * 32 + ni * 8 + g];
                b[ni][0] = crow[w0];
                b[ni][1] = crow[w0 + 4];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const unsigned int* r_lo = xs[buf][wm * 64 + mi * 16 + g];
                const unsigned int* r_hi = xs[buf][wm * 64 + mi * 16 + g + 8];
                const unsigned int a[4] = {r_lo[w0], r_hi[w0], r_lo[w0 + 4], r_hi[w0 + 4]};
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma<BF16>(acc[mi][ni], a, b[ni][0], b[ni][1]);
            }
        }

        if (chunk == chunks - 1) {
            const long long code0 = (long long)tile * TC_BN;
            const int codes_here = (int)min(k - code0, (long long)TC_BN);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int local = wn * 32 + ni * 8 + t4 * 2 + e;
                    if (local < codes_here) {
                        const unsigned int kc = (unsigned int)(code0 + local);
                        const float nrm = norms[kc];
#pragma unroll
                        for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
                            for (int h = 0; h < 2; ++h) {
                                const int i = mi * 2 + h;
                                const float s = fmaf(-2.0f, acc[mi][ni][h * 2 + e], nrm);
                                fold_score(bi[i], bs[i], ss[i], s, kc);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
        }

        tile = next_tile;
        chunk = next_chunk;
        buf ^= 1;
    }

    // The 4 lanes of a group (t4 = 0..3) hold the same rows: merge by shuffles.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        Cand c = {bi[i], bs[i], ss[i]};
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) c = shfl_merge_cand(c, off);
        if (t4 == 0) {
            const int r = wm * 64 + (i >> 1) * 16 + g + (i & 1) * 8;
            m_idx[wn][r] = c.idx;
            m_best[wn][r] = c.best;
            m_second[wn][r] = c.second;
        }
    }
    __syncthreads();
    // Then across the 4 code warps, in a fixed order.
    if (tid < TC_BM && tid < rows_here) {
        Cand c = {m_idx[0][tid], m_best[0][tid], m_second[0][tid]};
#pragma unroll
        for (int q = 1; q < 4; ++q) {
            const Cand o = {m_idx[q][tid], m_best[q][tid], m_second[q][tid]};
            c = merge_cand(c, o);
        }
        const long long r = row0 + tid;
        best_out[r] = c.idx;
        best_score_out[r] = c.best;
        second_score_out[r] = c.second;
    }
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
nearest_tf32(const float* __restrict__ x, const float* __restrict__ cb,
             const float* __restrict__ norms, unsigned int* __restrict__ best_out,
             float* __restrict__ best_score_out, float* __restrict__ second_score_out,
             long long n, long long k, int d) {
    nearest_tc_body<false>(x, cb, norms, best_out, best_score_out, second_score_out, n, k, d);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
nearest_bf16(const float* __restrict__ x, const float* __restrict__ cb,
             const float* __restrict__ norms, unsigned int* __restrict__ best_out,
             float* __restrict__ best_score_out, float* __restrict__ second_score_out,
             long long n, long long k, int d) {
    nearest_tc_body<true>(x, cb, norms, best_out, best_score_out, second_score_out, n, k, d);
}
