// faults.cu — kernels with the bugs the emulated device must turn into errors, and one correct
// kernel exercising every warp collective. Compiled into the emulator only (never to PTX, never
// listed in vqx::backend::cuda::kernels); tests/emu.rs launches them by name.
//
// Launch shape: one block of 64 threads (two warps) unless a test says otherwise; `out` holds
// at least blockDim.x ints (gridDim.x · blockDim.x for emu_ok_collectives).

// Correct: each warp sums its lanes with __shfl_down_sync, broadcasts with __shfl_sync, checks
// __shfl_xor_sync, __shfl_up_sync and __ballot_sync; warps combine through shared memory.
extern "C" __global__ void emu_ok_collectives(int* out)
{
    __shared__ int warp_sums[32];
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    int v = tid + 1;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int total = __shfl_sync(0xffffffffu, v, 0);
    const int partner = __shfl_xor_sync(0xffffffffu, tid, 1);
    const int below = __shfl_up_sync(0xffffffffu, tid, 1);
    const unsigned odd = __ballot_sync(0xffffffffu, tid & 1);
    if (lane == 0) warp_sums[tid >> 5] = total;
    __syncthreads();
    int block = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) block += warp_sums[w];
    // out = block sum, unless a lane's own checks failed (then -1 - tid).
    const bool ok = partner == (tid ^ 1) && below == (lane == 0 ? tid : tid - 1) &&
                    odd == 0xaaaaaaaau;
    out[blockIdx.x * blockDim.x + tid] = ok ? block : -1 - tid;
}

// Threads of one block at two different __syncthreads.
extern "C" __global__ void emu_fault_divergent_barrier(int* out)
{
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Thread 3 returns before a barrier the others wait at.
extern "C" __global__ void emu_fault_early_exit(int* out)
{
    if (threadIdx.x == 3) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Lane 7 skips a full-warp shuffle.
extern "C" __global__ void emu_fault_shuffle_missing_lane(int* out)
{
    int v = threadIdx.x;
    if (threadIdx.x != 7) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// Lanes 16–31 call a shuffle whose mask leaves them out.
extern "C" __global__ void emu_fault_lane_outside_mask(int* out)
{
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (int)threadIdx.x, 1);
}

// Lane 0 waits at a block barrier while its warp waits for it in a shuffle.
extern "C" __global__ void emu_fault_shuffle_vs_barrier(int* out)
{
    int v = threadIdx.x;
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

// Two lanes of one warp at two different shuffles.
extern "C" __global__ void emu_fault_divergent_shuffle(int* out)
{
    int v = threadIdx.x;
    if (threadIdx.x & 1) {
        v = __shfl_xor_sync(0xffffffffu, v, 2);
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 2);
    }
    out[threadIdx.x] = v;
}

// Takes a long long where launchers of the other kernels pass an int: for the argument check.
extern "C" __global__ void emu_fault_takes_i64(int* out, long long n)
{
    if (threadIdx.x < n) out[threadIdx.x] = 1;
}

// A grid-stride loop whose stride is 0 (gridDim.y − 1 with a 1-D grid): never ends. The
// watchdog aborts the process; tests/emu.rs runs it in a child process.
extern "C" __global__ void emu_fault_endless_loop(int* out)
{
    const long long stride = (long long)(gridDim.y - 1) * blockDim.x;
    for (long long e = threadIdx.x; e < (long long)blockDim.x; e += stride) atomicAdd(&out[e], 1);
}
