// sort.cu — the device-side counting sort of row ids by code, stable compaction, and the small
// helpers around them, so that the deterministic EMA sums and dead-code detection need no
// N-sized host round trip. The launchers are src/backend/cuda/sort.rs.
//
// What it computes
//   Stable counting sort (the device twin of vqx::ema::group_by_code, equal to it element for
//   element): from idx (N × u32, codes < K) the code offsets (K + 1 × u64, offsets[k] = number
//   of rows with a smaller code) and rows (N × u32): the row ids of each code, in increasing row
//   order. The N rows are split into S contiguous segments of `seg_len` rows (the launcher picks
//   S: 1 ≤ S ≤ max(1, N), S·K ≤ SORT_SCRATCH_MAX unless K alone exceeds it, S ≤ SORT_MAX_SEGMENTS)
//   and hist holds one u32 counter per (code, segment), code-major (hist[code·S + segment]):
//     fill_u32             hist = 0
//     sort_histogram_u32   hist[code·S + r / seg_len] += 1 for every row r (integer atomics:
//                          the counts do not depend on their order)
//     sort_scan_segments_u32  per code, the exclusive scan of its counters over the segments
//                          (in place) and its total into offsets[code]
//     scan_exclusive_u64   offsets[0..K] → exclusive scan, offsets[K] = N
//     sort_scatter_u32     one thread per segment walks its rows in increasing order and puts
//                          row r at offsets[code] + hist[code·S + segment]++. Each code's rows
//                          land segment after segment, each segment's in row order: stable, and
//                          the same result whatever the schedule (no atomics decide a position).
//   Stable compaction: from flags (n × u32) the ids i with flags[i] ≠ 0 in increasing order, and
//   their number in count[0], without the host knowing the count. Tiles of SORT_THREADS ×
//   SORT_ITEMS flags, one block each:
//     compact_count_u32    per tile, its number of set flags into tile_counts[tile]
//     scan_exclusive_u64   tile_counts → each tile's first output slot, tile_counts[T] = total
//     compact_scatter_u32  each thread takes SORT_ITEMS consecutive flags, a block scan gives
//                          its first slot; block 0 writes count[0] = tile_counts[T]
//   flags_below_f32        flags[i] = v[i] < threshold (dead codes: EMA cluster size below a
//                          threshold; NaN is never below)
//   gather_counted_u32     out[j] = src[idx[j]] for j < min(count[0], cap): the count is read on
//                          the device; an idx ≥ n_src gives 0xFFFFFFFF rather than a wild read
//
// Launch shape (kernels/tiles.cuh)
//   fill_u32, sort_histogram_u32, flags_below_f32, gather_counted_u32: 1-D grid-stride loops,
//     block = SORT_THREADS, any grid.
//   sort_scan_segments_u32: grid-stride over codes, one thread per code, any grid.
//   sort_scatter_u32: one thread per segment, block = SORT_THREADS, grid ≥ ceil(S / SORT_THREADS).
//   scan_exclusive_u64: exactly one block of SORT_THREADS (it loops over the data in chunks of
//     SORT_THREADS × SORT_ITEMS, carrying the running total).
//   compact_count_u32, compact_scatter_u32: block = SORT_THREADS, grid = T = ceil(n / (SORT_THREADS
//     × SORT_ITEMS)) ≥ 1 exactly (compact_scatter_u32 reads the total at tile_counts[gridDim.x]).
//
// Limits
//   N, n ≤ 2^32 − 1 (row ids and counts are u32), K ≤ 2^32 − 1 (offsets are u64). Codes ≥ K are
//   skipped by the sort kernels (never an out-of-bounds write; the host validates them anyway, so
//   this does not happen). One thread walks each segment and scans each code's counters: the
//   launcher keeps both serial lengths bounded (≥ SORT_MIN_SEGMENT_ROWS rows per segment and at
//   most SORT_MAX_SEGMENTS segments), but a large K forces few segments and long walks.

#include "tiles.cuh"
#include "grid.cuh"

static_assert(SORT_THREADS % 32 == 0 && SORT_THREADS <= 1024, "whole warps, one CUDA block");
static_assert(SORT_ITEMS >= 1, "each thread takes at least one element");

// Exclusive scan of v over the block; *total gets the sum over the block. Every thread of the
// block must call it (it holds barriers); blockDim.x must be a multiple of 32.
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long v,
                                                                   unsigned long long* total)
{
    __shared__ unsigned long long warp_sums[32];
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int warps = blockDim.x >> 5;
    unsigned long long x = v;
    for (unsigned int o = 1; o < 32u; o <<= 1) {
        const unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31u) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned long long w = lane < warps ? warp_sums[lane] : 0ull;
        for (unsigned int o = 1; o < 32u; o <<= 1) {
            const unsigned long long y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < warps) warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const unsigned long long before = warp == 0 ? 0ull : warp_sums[warp - 1];
    *total = warp_sums[warps - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return before + x - v;
}

extern "C" __global__ void fill_u32(unsigned int* __restrict__ p, unsigned int value, long long n)
{
    GRID_STRIDE_LOOP(i, n) {
        p[i] = value;
    }
}

extern "C" __global__ void sort_histogram_u32(const unsigned int* __restrict__ idx,
                                              long long n,
                                              long long k,
                                              long long seg_len,
                                              long long s,
                                              unsigned int* __restrict__ hist)
{
    GRID_STRIDE_LOOP(r, n) {
        const long long code = idx[r];
        if (code < k) atomicAdd(&hist[code * s + r / seg_len], 1u);
    }
}

extern "C" __global__ void sort_scan_segments_u32(unsigned int* __restrict__ hist,
                                                  long long k,
                                                  long long s,
                                                  unsigned long long* __restrict__ totals)
{
    GRID_STRIDE_LOOP(code, k) {
        unsigned int* h = hist + code * s;
        unsigned int run = 0u;  // ≤ N < 2^32
        for (long long seg = 0; seg < s; ++seg) {
            const unsigned int c = h[seg];
            h[seg] = run;
            run += c;
        }
        totals[code] = run;
    }
}

extern "C" __global__ void scan_exclusive_u64(unsigned long long* __restrict__ data, long long n)
{
    const long long chunk = (long long)blockDim.x * SORT_ITEMS;
    unsigned long long carry = 0ull;
    // The loop bound is the same for every thread, so all reach the scan's barriers together.
    for (long long base = 0; base < n; base += chunk) {
        const long long first = base + (long long)threadIdx.x * SORT_ITEMS;
        unsigned long long local[SORT_ITEMS];
        unsigned long long sum = 0ull;
        for (int i = 0; i < SORT_ITEMS; ++i) {
            local[i] = first + i < n ? data[first + i] : 0ull;
            sum += local[i];
        }
        unsigned long long total;
        unsigned long long run = carry + block_exclusive_scan(sum, &total);
        // Each thread rewrites only the elements it read itself.
        for (int i = 0; i < SORT_ITEMS; ++i) {
            if (first + i < n) data[first + i] = run;
            run += local[i];
        }
        carry += total;
    }
    if (threadIdx.x == 0) data[n] = carry;
}

extern "C" __global__ void sort_scatter_u32(const unsigned int* __restrict__ idx,
                                            long long n,
                                            long long k,
                                            long long seg_len,
                                            long long s,
                                            unsigned int* __restrict__ hist,
                                            const unsigned long long* __restrict__ offsets,
                                            unsigned int* __restrict__ rows)
{
    const long long seg = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (seg >= s) return;
    const long long begin = seg * seg_len;
    const long long end = begin + seg_len < n ? begin + seg_len : n;
    for (long long r = begin; r < end; ++r) {
        const long long code = idx[r];
        if (code >= k) continue;
        // This segment's own counter: no other thread touches it.
        unsigned int* slot = &hist[code * s + seg];
        rows[offsets[code] + *slot] = (unsigned int)r;
        *slot += 1u;
    }
}

extern "C" __global__ void compact_count_u32(const unsigned int* __restrict__ flags,
                                             long long n,
                                             unsigned long long* __restrict__ tile_counts)
{
    const long long first =
        ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SORT_ITEMS;
    unsigned long long c = 0ull;
    for (int i = 0; i < SORT_ITEMS; ++i) {
        if (first + i < n && flags[first + i] != 0u) ++c;
    }
    unsigned long long total;
    block_exclusive_scan(c, &total);
    if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

extern "C" __global__ void compact_scatter_u32(const unsigned int* __restrict__ flags,
                                               long long n,
                                               const unsigned long long* __restrict__ tile_offsets,
                                               unsigned int* __restrict__ out,
                                               unsigned int* __restrict__ count)
{
    const long long first =
        ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SORT_ITEMS;
    unsigned int set[SORT_ITEMS];
    unsigned long long c = 0ull;
    for (int i = 0; i < SORT_ITEMS; ++i) {
        set[i] = first + i < n && flags[first + i] != 0u;
        c += set[i];
    }
    unsigned long long total;
    unsigned long long slot = tile_offsets[blockIdx.x] + block_exclusive_scan(c, &total);
    for (int i = 0; i < SORT_ITEMS; ++i) {
        if (set[i]) out[slot++] = (unsigned int)(first + i);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) count[0] = (unsigned int)tile_offsets[gridDim.x];
}

extern "C" __global__ void flags_below_f32(const float* __restrict__ v,
                                           float threshold,
                                           long long n,
                                           unsigned int* __restrict__ flags)
{
    GRID_STRIDE_LOOP(i, n) {
        flags[i] = v[i] < threshold ? 1u : 0u;
    }
}

extern "C" __global__ void gather_counted_u32(const unsigned int* __restrict__ src,
                                              long long n_src,
                                              const unsigned int* __restrict__ idx,
                                              const unsigned int* __restrict__ count,
                                              long long cap,
                                              unsigned int* __restrict__ out)
{
    const long long m = (long long)count[0] < cap ? (long long)count[0] : cap;
    GRID_STRIDE_LOOP(j, m) {
        const long long i = idx[j];
        out[j] = i < n_src ? src[i] : 0xFFFFFFFFu;
    }
}
