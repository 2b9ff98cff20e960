// gather.cu — codebook rows by index (SPEC §2): out[n, :] = C[idx[n], :].
//
// What it computes
//   out (N×D, row-major f32) from the codebook C (K×D, row-major f32) and idx (N × u32). The host
//   validates every index against K before launching (vqx::gather::validate); the kernels do not
//   check them again.
//
// Launch shape (kernels/tiles.cuh; the launcher is src/backend/cuda/launch.rs)
//   gather_f32:   1-D grid-stride loop over the N·D output elements; block = GRID_STRIDE_THREADS (256),
//                 grid = min(ceil(N·D / 256), 32 × the SM count).
//   gather_f32x4: the same over N·D/4 float4 elements; used when D % 4 == 0 (the device
//                 allocations are 256-byte aligned, so every row then starts 16-byte aligned).
//   Consecutive threads write consecutive output elements: stores are coalesced, loads read
//   whole code rows (coalesced within a row, codebook rows stay in L2).
//
// Limits
//   N·D < 2^63 elements; D ≥ 1; K < 2^32.

#include "tiles.cuh"
#include "grid.cuh"

// One body for both widths: T is float (one element) or float4 (four).
template <typename T>
__device__ __forceinline__ void gather_rows(const T* __restrict__ cb,
                                            const unsigned int* __restrict__ idx,
                                            T* __restrict__ out,
                                            long long n,
                                            long long d)
{
    const long long total = n * d;
    GRID_STRIDE_LOOP(e, total) {
        const long long row = e / d;
        const long long col = e - row * d;
        out[e] = cb[(long long)idx[row] * d + col];
    }
}

extern "C" __global__ void gather_f32(const float* __restrict__ cb,
                                      const unsigned int* __restrict__ idx,
                                      float* __restrict__ out,
                                      long long n,
                                      long long d)
{
    gather_rows(cb, idx, out, n, d);
}

extern "C" __global__ void gather_f32x4(const float4* __restrict__ cb,
                                        const unsigned int* __restrict__ idx,
                                        float4* __restrict__ out,
                                        long long n,
                                        long long d4)
{
    gather_rows(cb, idx, out, n, d4);
}
