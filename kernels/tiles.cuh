// tiles.cuh — the launch-shape constants the kernels are written for, in one place. build.rs reads
// every `#define NAME VALUE  // doc` line below and generates the Rust constants the launchers
// use (vqx::backend::cuda::tiles), so a kernel and its launcher cannot disagree on a tile size.
// Each kernel static_asserts the values its thread mapping depends on.
#pragma once

#define NEAREST_BM 128           // rows per block of nearest_f32
#define NEAREST_BN 128           // codes per tile of nearest_f32
#define NEAREST_BK 8             // dimensions per shared-memory chunk of nearest_f32
#define NEAREST_PAD 4            // padding of nearest_f32's transposed shared tiles, in floats
#define NEAREST_THREADS 256      // threads per block of nearest_f32
#define TC_BM 128                // rows per block of nearest_tf32 / nearest_bf16
#define TC_BN 128                // codes per tile of nearest_tf32 / nearest_bf16
#define TC_WORDS 16              // 32-bit operand words per row per chunk of the tensor-core kernels
#define TC_STRIDE 20             // padded shared-memory row stride of the tensor-core kernels, in words
#define TC_THREADS 256           // threads per block of nearest_tf32 / nearest_bf16
#define RECHECK_THREADS 256      // threads per block of the per-row recheck kernels (one listed row per block, threads over codes)
#define ROW_THREADS 128          // threads per block of the one-thread-per-row kernels (norms, normalisation, the flag pass, grad_rotation_f32)
#define GRID_STRIDE_THREADS 256  // threads per block of the grid-stride kernels (gather, ema_sums_atomic, usage)
#define SORTED_MAX_THREADS 256   // largest block of ema_sums_sorted_f32 (one thread per column, looped beyond)
#define USAGE_SHARED_BYTES 49152 // largest per-block histogram of usage_u32 in dynamic shared memory
#define SORT_THREADS 256         // threads per block of the device sort and compaction kernels (kernels/sort.cu)
#define SORT_ITEMS 8             // consecutive elements per thread of scan_exclusive_u64 and the compaction kernels
#define SORT_SCRATCH_MAX 16777216 // most (code, segment) counters of the device sort: S·K ≤ this (S = 1 when K alone exceeds it)
#define SORT_MAX_SEGMENTS 65536  // most row segments of the device sort (each code's counters are scanned by one thread)
#define SORT_MIN_SEGMENT_ROWS 16 // fewest rows per segment of the device sort (more segments only add scratch)
#define ROW_MAX_THREADS 256      // largest block of the block-per-row kernels (ema_codebook_f32, reseed_f32): one thread per column, looped beyond
#define REDUCE_BLOCKS 256        // fixed grid of stage 1 of loss.cu's reductions: the partials per reduction
#define REDUCE_THREADS 256       // threads per block of loss.cu's reductions (a power of two: fixed-order tree)
