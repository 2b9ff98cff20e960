// grid.cuh — the grid-stride loop of the element-wise kernels, written once: `e` runs from this
// thread's global index, blockIdx.x·blockDim.x + threadIdx.x, in steps of the whole grid,
// gridDim.x·blockDim.x, while e < end. Any grid covers the range; the launchers size it to fill
// the device (src/backend/cuda/launch.rs, grid_stride). The step is computed first, as the
// kernels wrote it before: the same PTX.
#pragma once

#define GRID_STRIDE_LOOP(e, end) GRID_STRIDE_LOOP_FROM(e, 0, end)

// The same from index `first` on: e = first + this thread's global index, in steps of the grid.
#define GRID_STRIDE_LOOP_FROM(e, first, end)                                       \
    for (long long e##_stride = (long long)gridDim.x * blockDim.x,                 \
                   e = (first) + (long long)blockIdx.x * blockDim.x + threadIdx.x; \
         e < (end); e += e##_stride)
