// usage.cu — exact histogram of code indices (SPEC §5): counts[k] = #{n : idx[n] = k}.
//
// What it computes
//   counts (K × u32) from idx (N × u32). The host validates every index against K and zeroes
//   `counts` before launching; N ≤ u32::MAX so no count can overflow.
//
// Launch shape (kernels/tiles.cuh; the launcher is src/backend/cuda/launch.rs)
//   1-D grid-stride loop over the N indices, block = 256 threads
//   (grid = min(ceil(N / 256), 4 × the SM count)).
//   privatised != 0: each block keeps its own histogram in dynamic shared memory
//     (shared_mem_bytes = 4·K, used when 4·K ≤ 48 KiB, i.e. K ≤ 12,288), counts with shared
//     atomics, then adds its non-zero bins to `counts` with one global atomic each.
//   privatised == 0: global atomicAdd per index (any K).
//
// Limits: N < 2^63, K < 2^32. Integer atomics: the result is exact and order-independent.

#include "tiles.cuh"

extern "C" __global__ void usage_u32(const unsigned int* __restrict__ idx,
                                     unsigned int* __restrict__ counts,
                                     long long n,
                                     unsigned int k,
                                     int privatised)
{
    extern __shared__ unsigned int hist[];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (privatised) {
        for (unsigned int b = threadIdx.x; b < k; b += blockDim.x) hist[b] = 0u;
        __syncthreads();
        for (long long i = start; i < n; i += stride) atomicAdd(&hist[idx[i]], 1u);
        __syncthreads();
        for (unsigned int b = threadIdx.x; b < k; b += blockDim.x) {
            const unsigned int c = hist[b];
            if (c != 0u) atomicAdd(&counts[b], c);
        }
    } else {
        for (long long i = start; i < n; i += stride) atomicAdd(&counts[idx[i]], 1u);
    }
}
